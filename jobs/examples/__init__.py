"""Example job files (TOML) shipped with the package; see README.md."""
