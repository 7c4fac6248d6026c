"""Basics every layer uses: file writes, progress events, the redactor. Imports nothing of agent."""
