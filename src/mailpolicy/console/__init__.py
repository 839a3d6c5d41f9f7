"""``mailpolicy console``: the policy's settings in a browser (docs/console.md).

Needs the ``console`` extra (``pip install 'mailpolicy[console]'``); nothing
else in mailpolicy imports this package.
"""
