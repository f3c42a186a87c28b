"""Client API of modelfleet (re-exported from modelfleet.client); placeholder until issue 4."""
