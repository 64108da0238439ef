"""What the tests share besides fixtures (those live in tests/conftest.py):

paths     ROOT, the repository root
live      free_port, wait_for, stop_process, LiveServer (the real `python -m service` on loopback)
sse       the one server-sent-events reader, for every test that reads a stream
health    the one stand-in /api/health server (run-local's and deploy-azure's health waits)
engines   ready_engine, ScriptedBackend, scripted_engine
fake_arm  a fake Azure Resource Manager on loopback
browser   headless Chromium fixtures (a pytest plugin, loaded by conftest) and page helpers
postgres  the test PostgreSQL (QWENBOX_TEST_DATABASE_URL): a fresh schema per test
haproxy   HAProxy on loopback in front of live servers, the load balancer's stand-in
slow_app  the production app with a scripted, slow (and optionally slow-loading) model
image     the image tests' engine helpers, stand-in hub and ImageBuilds (both images, built in the background)
"""
