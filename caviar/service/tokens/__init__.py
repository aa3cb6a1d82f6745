"""API tokens: creation, listing, revocation and verification (hashed, scoped)."""
