"""Real-browser test helpers (Voila + headless Chromium via Playwright) and the fixture notebook."""
