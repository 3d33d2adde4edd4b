"""The fault campaign (marker `faults`, not in the default run): see test_campaign.py."""
