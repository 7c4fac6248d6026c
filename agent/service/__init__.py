"""The daemon and what it serves: control socket, HTTP, webhooks, metrics, notifications."""
