"""Model builders. ``supra.models.supra`` holds the SUPRA family."""

from supra.models.supra import *  # noqa: F401,F403
from supra.models.supra import __all__
