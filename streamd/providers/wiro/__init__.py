"""Wiro (wiro.ai): signed REST client, task WebSocket, `/Task/Detail` repair. See provider.py."""
