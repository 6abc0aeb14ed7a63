// Key Vault holding the worker's secrets.
//
// Key Vault secret names allow letters, digits and `-` only, so each
// environment variable maps to its name with `_` replaced by `-`
// (AZURE_STORAGE_CONNECTION_STRING -> AZURE-STORAGE-CONNECTION-STRING).
// `entryNames` below is that mapping, the single place it is written down;
// the Logic App receives it as a parameter and tests/infra.rs checks it
// against the variables the binary reads.
//
// Secret values arrive as secure parameters and are never outputs.

@description('Vault name (3-24 letters, digits and hyphens).')
@minLength(3)
@maxLength(24)
param vaultName string

param location string = resourceGroup().location
param tags object = {}

@secure()
@description('AZURE_STORAGE_CONNECTION_STRING for the polling and job modes.')
param storageConnectionString string

@secure()
@description('SUPABASE_KEY, passed through to exec handlers that list it.')
param supabaseKey string

@secure()
@description('OPENAI_API_KEY, passed through to exec handlers that list it.')
param openaiApiKey string

@secure()
@description('WORKER_WEBHOOK_SECRET: whsec_ followed by base64 of 24-64 random bytes.')
param webhookSecret string

@description('Principal ids granted Key Vault Secrets User (read secret values).')
param secretsUserPrincipalIds array = []

@description('Let ARM deployments read secrets (worker-container.bicep uses getSecret()).')
param enabledForTemplateDeployment bool = true

var entryNames = {
  AZURE_STORAGE_CONNECTION_STRING: 'AZURE-STORAGE-CONNECTION-STRING'
  SUPABASE_KEY: 'SUPABASE-KEY'
  OPENAI_API_KEY: 'OPENAI-API-KEY'
  WORKER_WEBHOOK_SECRET: 'WORKER-WEBHOOK-SECRET'
}
var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: vaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForTemplateDeployment: enabledForTemplateDeployment
    enabledForDeployment: false
    enabledForDiskEncryption: false
    // checkov:skip=CKV_AZURE_189: A Consumption Logic App reads secrets at run time, has no fixed outbound address and is no Key Vault trusted service (README, trade-offs); reads still need Key Vault Secrets User.
    publicNetworkAccess: 'Enabled'
    // checkov:skip=CKV_AZURE_109: Same trade-off as CKV_AZURE_189: no firewall rule can name the Logic App's addresses.
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource storageConnectionStringEntry 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: entryNames.AZURE_STORAGE_CONNECTION_STRING
  // checkov:skip=CKV_AZURE_41: An expiry would stop every task at once; rotation is an operator runbook (README), not a timer.
  properties: {
    value: storageConnectionString
    contentType: 'text/plain'
  }
}

resource supabaseKeyEntry 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: entryNames.SUPABASE_KEY
  // checkov:skip=CKV_AZURE_41: An expiry would stop every task at once; rotation is an operator runbook (README), not a timer.
  properties: {
    value: supabaseKey
    contentType: 'text/plain'
  }
}

resource openaiApiKeyEntry 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: entryNames.OPENAI_API_KEY
  // checkov:skip=CKV_AZURE_41: An expiry would stop every task at once; rotation is an operator runbook (README), not a timer.
  properties: {
    value: openaiApiKey
    contentType: 'text/plain'
  }
}

resource webhookSecretEntry 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: entryNames.WORKER_WEBHOOK_SECRET
  // checkov:skip=CKV_AZURE_41: An expiry would stop every task at once; rotation is an operator runbook (README), not a timer.
  properties: {
    value: webhookSecret
    contentType: 'text/plain'
  }
}

resource secretsUsers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in secretsUserPrincipalIds: {
  name: guid(vault.id, principalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

output vaultName string = vault.name
output vaultId string = vault.id
output vaultUri string = vault.properties.vaultUri
@description('Environment variable name -> Key Vault entry name (names only, never values).')
output entryNames object = entryNames
