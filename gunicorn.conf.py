# Read by `gunicorn 'app:create_app()'` from this folder: the same server as `python app.py`.
# Options given on the command line take precedence over these.
from server import SETTINGS, on_starting  # noqa: F401

globals().update(SETTINGS)
