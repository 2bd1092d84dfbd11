"""Reliability tests: real processes killed, bad inputs fed, runs repeated.

A package so that `helpers` imports as `reliability.helpers` and test module names cannot clash with
tests/ (tests/conftest.py fixtures stay visible: pytest collects conftest files up to the rootdir).
"""
