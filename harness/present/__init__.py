"""Presentation: text, HTML, JUnit, Prometheus, crash views and the live status line."""
