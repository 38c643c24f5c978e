"""Gradio app for asking questions about whole books (document loading, chat UI)."""
