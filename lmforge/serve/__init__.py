"""Serving: the generation engine, the feedback store, and the web app with the OpenAI API."""
