"""The embedded engine: state, lifecycle, locks, journal, behind api.Connection."""
