from modelpress.runner.cli import run

run()
