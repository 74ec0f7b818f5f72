//! Tiered, content-addressed snapshot storage. See docs/design.md; the store lands with its own issue.
