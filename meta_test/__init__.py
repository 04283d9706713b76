"""meta_test package."""
