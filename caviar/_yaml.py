"""YAML without aliases: a definition file cannot expand into billions of items (an alias bomb)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses anchors and aliases (``&a`` / ``*a``)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in caviar files", event.start_mark
            )
        return super().compose_node(parent, index)


def load(text: str) -> Any:
    """One YAML (or JSON) document."""
    return yaml.load(text, Loader=_NoAliasLoader)


def load_all(text: str) -> Iterator[Any]:
    """Every document of a multi-document YAML stream."""
    return yaml.load_all(text, Loader=_NoAliasLoader)
