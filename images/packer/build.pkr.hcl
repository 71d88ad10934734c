# The one build of the three images: images/ and the wheel uploaded, then the shared
# provisioning scripts (images/provision), as root.

build {
  sources = ["source.amazon-ebs.runner", "source.googlecompute.runner", "source.azure-arm.runner"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}"]
  }

  # images/ (systemd unit, GCE user-data step) and the wheel, if any.
  provisioner "file" {
    source      = "${path.root}/../"
    destination = local.staging
  }

  provisioner "file" {
    source      = local.wheel_source
    destination = "${local.staging}/${basename(local.wheel_source)}"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = concat(
      local.provision_env,
      ["PVR_RUNNER_EXTRAS=${var.runner_extras != "" ? var.runner_extras : local.default_extras[source.type]}"],
      var.extra_env,
    )
    scripts = [
      "${path.root}/../provision/base.sh",
      "${path.root}/../provision/nvidia.sh",
      "${path.root}/../provision/runner.sh",
      "${path.root}/../provision/cleanup.sh",
    ]
  }

  # Azure's generalization, last: removes the build user (so no cleanup of this script).
  provisioner "shell" {
    only            = ["azure-arm.runner"]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    inline          = ["if command -v waagent >/dev/null; then waagent -force -deprovision+user; fi", "sync"]
    inline_shebang  = "/bin/sh -eu"
    skip_clean      = true
  }
}
