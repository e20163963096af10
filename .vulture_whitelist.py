"""Names that vulture's dead-code check cannot see being used; read by vulture only, never run.

CI runs ``vulture medsae tests bench .vulture_whitelist.py`` (settings in pyproject.toml's
``[tool.vulture]``): a function, class, attribute or variable that nothing refers to is reported.
Functions decorated for typer, pydantic or pytest are skipped by the settings; what is used from
outside Python (a framework's hook, a template, the README's API) is named here, each with its user.
A name listed here counts as used everywhere, so list only what the comment explains.
"""

# Module-level __getattr__ (PEP 562): lazy attributes of `import medsae` and `import medsae.report`.
__getattr__

# The Python API documented in the README (medsae.open(...).experiment(...), medsae.resources).
_.embeddings  # medsae/api.py
_.codes_table  # medsae/api.py
example_spec  # medsae/resources.py

# Read by the report's jinja template (medsae/report/templates/report.html.j2).
_.activation  # medsae/report/cards.py Thumb
_.is_baseline  # medsae/report/cards.py
_.slice_source  # medsae/report/cards.py Card

# pydantic: the model configuration, and a field read from the raw data by a before-validator.
model_config  # medsae/specbase.py
preset  # medsae/sae/config.py (apply_preset)

# litellm reads this module attribute (medsae/interp/llm/gateway.py silences its banner).
_.suppress_debug_info

# http.server calls these on the handler and server classes (tests/llm_server.py).
protocol_version
_.log_message
_.do_POST
daemon_threads
request_queue_size

# html.parser calls these on a parser subclass (tests/test_report_html.py).
_.handle_starttag
_.handle_endtag
_.handle_data

# pytest reads these: module-level marks, and a fixture that tests receive by importing it.
pytestmark
llm_server_fixture
