"""Fakes and simulators shared by the tests and the demo."""
