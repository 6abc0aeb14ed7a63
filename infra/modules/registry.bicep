// Azure Container Registry for the worker image.
//
// No admin user: CI pushes with an Entra identity (OIDC) or a scoped token,
// and every runtime (ACI groups, Container Apps) pulls through a user-assigned
// managed identity holding AcrPull, so no registry password exists anywhere.

@description('Registry name (5-50 letters and digits).')
@minLength(5)
@maxLength(50)
param registryName string

param location string = resourceGroup().location
param tags object = {}

@allowed([
  'Basic'
  'Standard'
  'Premium'
])
param sku string = 'Basic'

@description('Principal ids granted AcrPull (the runtime identity).')
param pullPrincipalIds array = []

var acrPullRoleId = '7f951dda-4ed3-4680-a7ca-43fe172d538d'

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: registryName
  location: location
  tags: tags
  // checkov:skip=CKV_AZURE_163: Image scanning is Defender for Containers, enabled per subscription rather than per registry.
  // checkov:skip=CKV_AZURE_166: Quarantine needs the Premium SKU; CI checks that the pushed sha tag exists instead.
  sku: {
    name: sku
  }
  properties: {
    adminUserEnabled: false
    // No anonymousPullEnabled: API version 2023-07-01 has no such property
    // (the preview versions and Standard/Premium do); anonymous pull is off
    // unless enabled, so every pull needs the AcrPull identity.
    // checkov:skip=CKV_AZURE_139: ACI groups outside a VNet pull over the public endpoint; every pull still needs the AcrPull identity.
    publicNetworkAccess: 'Enabled'
  }
}

resource pullers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in pullPrincipalIds: {
  name: guid(registry.id, principalId, acrPullRoleId)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

output registryName string = registry.name
output registryId string = registry.id
output loginServer string = registry.properties.loginServer
