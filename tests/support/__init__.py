"""Test infrastructure shared by the tests and the reliability scenarios: servers, rank runners, crash zygote."""
