"""Runware: a persistent WebSocket with session resume, and REST `getResponse` polling as repair.

`normalise` (pure: frames to observations, batch counting), `client` (REST and the task objects
both channels send), `provider` (`RunwareProvider`: the socket loop, pings, the repair poller).
"""
