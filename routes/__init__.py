"""The HTTP routes, one module per endpoint family; each exposes ``router``. ``app.py`` includes them."""
