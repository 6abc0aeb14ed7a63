// Everything the Container Apps path needs for one client, in one resource
// group: the shared modules of the ACI path (queues, registry, runtime
// identity, Key Vault, monitoring and budget, under infra/modules) plus a
// Container Apps environment and an event-driven job (job.bicep).
//
// The one identity gets every role the job needs: AcrPull (pull the image),
// Key Vault Secrets User (resolve the secret references) and Storage Queue
// Data Contributor (the worker leases, deletes and poisons messages, writes
// and drains the webhook outbox, and the scaler reads the queue lengths), so
// the worker runs without a connection string.
//
// Deploy (see README.md next to this file):
//   az deployment group create -g <rg> -f infra/containerapps/main.bicep -p @main.parameters.json

@description('Client name: lowercase letters, digits and single hyphens. Queues are <client>-tasks and <client>-tasks-poison.')
@minLength(2)
@maxLength(20)
param client string

param location string = resourceGroup().location

@description('Image tag the job runs (a git sha pushed by CI; latest only for a first test).')
param imageTag string

@description('Create the environment and the job. false for the very first deployment, which only creates the registry the image is pushed to.')
param deployJob bool = true

@description('vCPU cores per execution (decimal string).')
param cpuCores string = '1'

@description('Memory in GiB per execution (decimal string); the Consumption profile pairs 2 GiB with each vCPU.')
param memoryInGb string = '2'

@description('WORKER_TASK_TIMEOUT in seconds.')
@minValue(1)
param taskTimeoutSeconds int = 1800

@description('Seconds the platform waits beyond the task timeout before it stops a replica (start-up, webhook retries, settlement, one outbox batch).')
@minValue(300)
param settleMarginSeconds int = 360

@description('WORKER_VISIBILITY_TIMEOUT in seconds (the lease, renewed at half-life).')
@minValue(60)
@maxValue(3600)
param visibilityTimeoutSeconds int = 300

@description('WORKER_MAX_DEQUEUE_COUNT: deliveries before a failing message is poisoned.')
@minValue(1)
param maxDequeueCount int = 5

@description('WORKER_RETRY_DELAY: base seconds before a failed message is visible again.')
@minValue(0)
param retryDelaySeconds int = 10

@description('Most executions started per polling interval.')
@minValue(1)
param maxExecutions int = 10

@description('Seconds between two polls of the queue by the scaler.')
@minValue(10)
param pollingIntervalSeconds int = 30

@allowed([
  'identity'
  'connectionString'
])
@description('Scaler authentication: the job identity, or the storage connection string from Key Vault (fallback).')
param scalerAuth string = 'identity'

@description('E-mail addresses for alerts and budget notifications.')
@minLength(1)
param alertEmails array

@description('Optional HTTPS endpoint that also receives alerts. Empty: none.')
param alertWebhookUrl string = ''

@description('Monthly budget for the resource group, in the billing currency.')
param monthlyBudget int = 50

// No default: the Consumption API refuses to change a budget's start date
// ("Start date of budgets cannot be updated"), and a default of this month
// would change it on every redeployment from the second month on. Set it once,
// to the first day of the month of the first deployment, in the parameter file.
@description('First day of the budget period (yyyy-MM-01): the month of the first deployment, then never changed (Azure refuses to move a budget\'s start).')
@minLength(10)
@maxLength(10)
param budgetStartDate string

@secure()
@description('SUPABASE_KEY for exec handlers (any non-empty placeholder when unused).')
param supabaseKey string

@secure()
@description('OPENAI_API_KEY for exec handlers (any non-empty placeholder when unused).')
param openaiApiKey string

@secure()
@description('WORKER_WEBHOOK_SECRET: whsec_ + base64 of 24-64 random bytes.')
param webhookSecret string

// List prices for the dashboard's cost estimate only (nothing is billed by
// them): USD, pay-as-you-go, East US, the Consumption profile, active usage, as quoted in
// README.md next to this file; recorded 2026-12-01 and not re-checked against
// the live price list since. Set your region's and currency's prices here.
@description('Dashboard cost estimate: list price per vCPU-second (decimal string; default USD, East US, the Consumption profile, active usage, 2026-12-01).')
param pricePerVcpuSecond string = '0.000024'

@description('Dashboard cost estimate: list price per GiB-second of memory (decimal string; default USD, East US, the Consumption profile, active usage, 2026-12-01).')
param pricePerGbSecond string = '0.000003'

param tags object = {}

var suffix = uniqueString(resourceGroup().id, client)
var compactClient = replace(client, '-', '')
// Globally unique names keep all 13 characters of the suffix: the client is
// cut instead (2 + 9 + 13 = 24, the storage and vault limit; a registry takes
// 50, room for the whole client). tests/infra.rs checks this for a 20-character
// client.
var storageAccountName = 'st${take(compactClient, 9)}${suffix}'
var registryName = 'cr${compactClient}${suffix}'
var keyVaultName = 'kv${take(compactClient, 9)}${suffix}'
var workspaceName = 'log-${client}-worker'
var environmentName = 'cae-${client}-worker'
var jobName = 'job-${client}-worker'
var allTags = union(tags, {
  workload: 'worker'
  client: client
})

module identity '../modules/identity.bicep' = {
  name: 'identity-${client}'
  params: {
    name: 'id-${client}-worker'
    location: location
    tags: allTags
  }
}

module storage '../modules/storage.bicep' = {
  name: 'storage-${client}'
  params: {
    client: client
    accountName: storageAccountName
    location: location
    tags: allTags
    dataContributorPrincipalIds: [
      identity.outputs.principalId
    ]
  }
}

module registry '../modules/registry.bicep' = {
  name: 'registry-${client}'
  params: {
    registryName: registryName
    location: location
    tags: allTags
    pullPrincipalIds: [
      identity.outputs.principalId
    ]
  }
}

module monitoring '../modules/monitoring.bicep' = {
  name: 'monitoring-${client}'
  params: {
    client: client
    workspaceName: workspaceName
    location: location
    tags: allTags
    alertEmails: alertEmails
    alertWebhookUrl: alertWebhookUrl
    monthlyBudget: monthlyBudget
    budgetStartDate: budgetStartDate
  }
}

// The task dashboard (an Azure Monitor workbook on the worker's log lines).
module dashboard '../modules/dashboard.bicep' = {
  name: 'dashboard-${client}'
  params: {
    client: client
    location: location
    tags: allTags
    workspaceId: monitoring.outputs.workspaceId
    vcpuCores: cpuCores
    memoryInGb: memoryInGb
    pricePerVcpuSecond: pricePerVcpuSecond
    pricePerGbSecond: pricePerGbSecond
    jobName: jobName
  }
}

// Read back here (not output by the module) so the key only ever travels into
// a secure parameter. The vault keeps the connection string for operators
// (worker enqueue, poison replay) and for the scaler fallback.
resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

module keyVault '../modules/keyvault.bicep' = {
  name: 'keyvault-${client}'
  dependsOn: [
    storage
  ]
  params: {
    vaultName: keyVaultName
    location: location
    tags: allTags
    storageConnectionString: 'DefaultEndpointsProtocol=https;AccountName=${storageAccountName};AccountKey=${storageAccount.listKeys().keys[0].value};EndpointSuffix=${environment().suffixes.storage}'
    supabaseKey: supabaseKey
    openaiApiKey: openaiApiKey
    webhookSecret: webhookSecret
    secretsUserPrincipalIds: [
      identity.outputs.principalId
    ]
  }
}

module job 'job.bicep' = if (deployJob) {
  name: 'job-${client}'
  params: {
    client: client
    environmentName: environmentName
    jobName: jobName
    location: location
    tags: allTags
    storageAccountName: storage.outputs.accountName
    vaultUri: keyVault.outputs.vaultUri
    vaultEntryNames: keyVault.outputs.entryNames
    registryLoginServer: registry.outputs.loginServer
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    image: '${registry.outputs.loginServer}/worker:${imageTag}'
    cpuCores: cpuCores
    memoryInGb: memoryInGb
    taskTimeoutSeconds: taskTimeoutSeconds
    settleMarginSeconds: settleMarginSeconds
    visibilityTimeoutSeconds: visibilityTimeoutSeconds
    maxDequeueCount: maxDequeueCount
    retryDelaySeconds: retryDelaySeconds
    maxExecutions: maxExecutions
    pollingIntervalSeconds: pollingIntervalSeconds
    scalerAuth: scalerAuth
    workspaceName: monitoring.outputs.workspaceName
  }
}

output storageAccountName string = storage.outputs.accountName
output tasksQueueName string = storage.outputs.tasksQueueName
output poisonQueueName string = storage.outputs.poisonQueueName
output webhooksQueueName string = storage.outputs.webhooksQueueName
output registryName string = registry.outputs.registryName
output registryLoginServer string = registry.outputs.loginServer
output identityName string = identity.outputs.name
output identityClientId string = identity.outputs.clientId
output keyVaultName string = keyVault.outputs.vaultName
output workspaceName string = monitoring.outputs.workspaceName
output environmentName string = environmentName
output jobName string = jobName
