# The Azure image (a managed image): `make image-azure`, i.e. `packer build
# -only=azure-arm.runner images/packer`. Credentials: a service principal
# (ARM_CLIENT_ID, ARM_CLIENT_SECRET, ARM_TENANT_ID), `az login` with
# use_azure_cli_auth = true, or the builder's managed identity; subscription from
# ARM_SUBSCRIPTION_ID. The resource group must exist. Shared variables and the build:
# common.pkr.hcl, build.pkr.hcl.

variable "subscription_id" {
  type    = string
  default = env("ARM_SUBSCRIPTION_ID")
}

variable "tenant_id" {
  type    = string
  default = env("ARM_TENANT_ID")
}

variable "client_id" {
  type    = string
  default = env("ARM_CLIENT_ID")
}

variable "client_secret" {
  type      = string
  default   = env("ARM_CLIENT_SECRET")
  sensitive = true
}

variable "use_azure_cli_auth" {
  type    = bool
  default = false
}

variable "location" {
  type    = string
  default = "eastus"
}

variable "vm_size" {
  description = "Builder VM size; the image runs on any size (an N-series one for gpu = true)."
  type        = string
  default     = "Standard_D2s_v5"
}

variable "base_image_publisher" {
  type    = string
  default = "Debian"
}

variable "base_image_offer" {
  type    = string
  default = "debian-12"
}

variable "base_image_sku" {
  description = "Debian 12, Hyper-V generation 2 (arm64: 12-arm64, with an arm64 vm_size)."
  type        = string
  default     = "12-gen2"
}

variable "resource_group" {
  description = "Existing resource group that receives the managed image."
  type        = string
  default     = "prefect-vm-runner-images"
}

source "azure-arm" "runner" {
  subscription_id    = var.subscription_id
  tenant_id          = var.tenant_id
  client_id          = var.client_id
  client_secret      = var.client_secret
  use_azure_cli_auth = var.use_azure_cli_auth

  location        = var.location
  vm_size         = var.vm_size
  os_type         = "Linux"
  image_publisher = var.base_image_publisher
  image_offer     = var.base_image_offer
  image_sku       = var.base_image_sku
  os_disk_size_gb = var.disk_size_gb

  managed_image_name                = local.name
  managed_image_resource_group_name = var.resource_group

  azure_tags = {
    "prefect-vm-runner-version" = local.version
    "prefect-vm-runner-gpu"     = var.gpu ? "true" : "false"
  }
}
