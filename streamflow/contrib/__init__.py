"""Optional integrations with third-party libraries; each module needs its own extra."""
