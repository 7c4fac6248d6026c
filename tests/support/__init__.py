"""Real servers for tests, started in-process or as child processes on 127.0.0.1.

- `sshd.SshServer`: a throwaway OpenSSH server (Debian `openssh-server`) with its own host
  key, for Git over SSH and for the host engine.
- `git_http.GitHttpServer`: an HTTPS Git server (`git http-backend` behind `http.server`)
  with a CA and certificate generated per server.

Each stops what it started, by PID or by shutting its own thread down, and nothing else.
"""
