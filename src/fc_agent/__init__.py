"""fc_agent: the guest agent (PID 1 in the guest), standard library only."""
