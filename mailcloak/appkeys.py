"""Keys under which the daemon's parts are stored on the aiohttp Application."""

from aiohttp import web

from mailcloak.config import Config
from mailcloak.metrics import Metrics
from mailcloak.runtime import RuntimeRef
from mailcloak.state import StateCache

CONFIG = web.AppKey("config", Config)          # the config the process started with
CONFIG_PATH = web.AppKey("config_path", str)
STATE = web.AppKey("state", StateCache)
RUNTIME = web.AppKey("runtime", RuntimeRef)    # the config and IdP in force (swapped on SIGHUP)
SERVERS = web.AppKey("servers", list)          # the UnixServer objects (policy, socketmap)
METRICS = web.AppKey("metrics", Metrics)       # the daemon's own Prometheus registry
