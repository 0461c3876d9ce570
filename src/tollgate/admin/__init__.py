"""The admin API, served by the supervisor on its own listener."""
