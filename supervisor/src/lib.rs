//! flintd and the flint CLI.
