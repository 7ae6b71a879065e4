#!/usr/bin/env bash
# Start the local Redis and PostgreSQL the tests talk to, if they are not up yet.
set -uo pipefail
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no >/dev/null
  for _ in $(seq 20); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "starting PostgreSQL"
  (service postgresql start || pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start) >/dev/null 2>&1
  for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname='test'" 2>/dev/null | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -c "create database test" >/dev/null 2>&1 || true
fi
# A real browser for tests/test_web_browser.py (it skips, saying so, where none can be installed).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver"
    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }) \
      || echo "could not install chromium; the browser tests will be skipped"
  else
    echo "chromium/chromedriver missing and not installable here (needs apt-get as root); the browser tests will be skipped"
  fi
fi
# dciodvfy (Debian's dicom3tools) validates the DICOM SEG and SR in tests/test_dicom_outputs.py;
# dcmtk's storescu is the C sender (as PACS are) of tests/test_dicom_listener.py and make bench-dicom.
for tool in dciodvfy:dicom3tools storescu:dcmtk; do
  command="${tool%%:*}" package="${tool##*:}"
  command -v "$command" >/dev/null 2>&1 && continue
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing $package"
    (apt-get install -y -q "$package" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$package" >/dev/null 2>&1; }) \
      || echo "could not install $package; the tests that use $command will be skipped"
  else
    echo "$command missing and not installable here (needs apt-get as root); the tests that use it will be skipped"
  fi
done
exit 0
