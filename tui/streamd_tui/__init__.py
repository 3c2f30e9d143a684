"""The streamd dashboard (`streamd tui`): a Textual app that is a client of the daemon's feed only."""
