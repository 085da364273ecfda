"""The in-sandbox runtime: the HTTP API an agent's sandbox pod serves.

It runs commands and file operations in the workspace under the template's tool policy
(``policy``), vets skills before they load (``skills``), appends every call to a hash-chained
audit log (``audit``), and writes and restores state snapshots for pause/resume
(``snapshot``). ``server`` wires them into the HTTP API; ``runtime_cli`` is
``kleave sandbox runtime``.
"""
