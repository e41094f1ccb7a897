"""Notices: rendering (render.py), channels (email.py, slack.py) and the durable outbox (outbox.py).

Import the submodules directly; this package imports nothing heavy so that ``reaper.notify.outbox``
stays cheap to load.
"""
