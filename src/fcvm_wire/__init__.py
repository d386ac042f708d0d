"""Wire protocols shared by the host (`fcvm`) and the guest (`fc_agent`).

Standard library only: this package is copied into the guest next to fc_agent.
"""
