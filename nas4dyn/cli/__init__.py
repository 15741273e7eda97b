"""The `nas4dyn` command line: one small module per verb; each only parses, configures and reports."""
