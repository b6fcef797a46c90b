"""Reliability scenarios: ckptmgr broken on purpose (kill -9, full disks, corruption, hostile files, flaky networks).

Each scenario module runs many trials and returns a :class:`~reliability.common.Tally`.
The fast tests in ``tests/reliability/`` run them with small counts;
``scripts/reliability_report.py`` runs the long versions and prints the figures.
"""
