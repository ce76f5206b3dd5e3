"""Built-in training strategies, one module per plugin, grouped by the hooks they use.

``BUILTIN_PLUGINS`` maps the name users type in ``--plugins`` to ``module:class``; modules
are imported only when their plugin is used or listed.
"""

BUILTIN_PLUGINS: dict[str, str] = {}
