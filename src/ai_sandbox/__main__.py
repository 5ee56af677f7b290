from ai_sandbox.cli.main import run

run()
