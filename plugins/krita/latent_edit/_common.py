"""Where the shared stdlib client lives: installed, ``plugins/common`` is copied into this package as
``common/``; in a source checkout the repository's ``plugins.common`` package is used."""
try:  # installed layout (plugins/install_plugins.py)
    from .common import client, flow, msgpack_codec, paths, pixels  # noqa: F401
except ImportError:  # source checkout: tests import plugins.krita.latent_edit
    from plugins.common import client, flow, msgpack_codec, paths, pixels  # noqa: F401
