from nstjax.cli import entry

entry()
