"""Data: sources and formats, the shapes sets, collation, odd and corrupt records."""
