"""Start and supervise this host's model servers; placeholder until issue 5."""
