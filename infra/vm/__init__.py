"""What runs on a VM: its first-boot data (cloud-init), its reverse proxy (Caddy) and the script that
(re)creates the container. Rendered here, validated values only; nothing here talks to a cloud."""
