"""KKT math shared by the solvers, the diagnostics and the implicit backward.

``functions``: Lagrangians and constraint maps of a :class:`~declopt.program.Program`;
``tolerances``: the one table of tolerances; ``point``: the KKT point of a batch of solutions;
``newton``: one Newton step on the KKT equations of a held set of rows.
"""
