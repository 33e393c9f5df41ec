"""The gateway: routes each request by adapter id to the replica most likely holding it hot.

It never imports torch, so its image layer and start-up stay small.
"""
