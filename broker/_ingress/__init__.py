"""Where messages enter: the shared HTTP listener, and the runner that keeps each source
running (restarted with back-off after a crash). Sources publish through
busway._components.
"""
