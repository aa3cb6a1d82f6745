"""Scheduled batch studies: cron schedules that create and queue one study per tick."""
