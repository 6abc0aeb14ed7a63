// One worker task as an Azure Container Instances group: one container, run
// once (restart policy Never), image pulled through the runtime identity,
// secrets as secure environment variables, stdout/stderr to Log Analytics.
// The same identity writes a webhook the container cannot deliver to the
// outbox <client>-webhooks (WORKER_CLIENT, AZURE_STORAGE_ACCOUNT,
// AZURE_CLIENT_ID; it holds Storage Queue and Blob Data Contributor on the account).
//
// This is the shape the Logic App creates for every queue message
// (infra/aci/logic-app-trigger.bicep writes the same body as JSON);
// tests/infra.rs keeps the two and the binary in agreement.
//
// ACI stops a container without a SIGTERM grace period, so the in-container
// WORKER_TASK_TIMEOUT is the only timeout guard on this path: it must stay
// below anything that would stop the group from outside.
//
// Logs: the group's own diagnostics.logAnalytics, workspace id and key,
// writes the classic custom table ContainerInstanceLog_CL, column Message,
// and ContainerEvent_CL. Azure's page Container group and instance logging
// with Azure Monitor logs, container-instances-log-analytics, dated
// 25 July 2026, still documents it as the integration set in the group
// body; it needs a workspace that accepts public ingestion and key auth.
// The resource-specific tables ContainerInstanceLog and ContainerEvent,
// per the Container Instances monitoring data reference, are filled only
// by a diagnostic setting on the group: it exists only after the group
// does, needs a subscription-level preview feature, and applying it
// restarts the group, which for a run-once task means a second run. So
// the templates keep logAnalytics. The HTTP Data Collector API behind
// classic custom tables is retired since 14 September 2026, see
// azure-monitor/logs/custom-logs-migrate; for Container Apps Azure
// announced that such existing ingestion goes on with critical fixes
// only, microsoft/azure-container-apps#1812. The dashboard reads both
// tables, so it keeps working if ACI moves to ContainerInstanceLog.
// logType ContainerInstanceLogs sends logs, not only metrics.

@description('Container group name: at most 63 lowercase letters, digits and single hyphens.')
@minLength(1)
@maxLength(63)
param name string

param location string = resourceGroup().location

@description('Tags; the cleanup workflow deletes finished groups tagged managed-by=worker-task.')
param tags object = {}

@description('Full image reference, e.g. myregistry.azurecr.io/worker:<git sha>.')
param image string

param registryLoginServer string

@description('Resource id of the user-assigned identity holding AcrPull, Storage Queue Data Contributor and Storage Blob Data Contributor.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID).')
param identityClientId string

@description('Client name (WORKER_CLIENT): the outbox is <client>-webhooks.')
@minLength(2)
@maxLength(20)
param client string

@description('Storage account holding the queues (AZURE_STORAGE_ACCOUNT).')
param storageAccountName string

@description('vCPU cores (a decimal string, e.g. 1 or 0.5).')
param cpuCores string = '1'

@description('Memory in GB (a decimal string, e.g. 2 or 1.5).')
param memoryInGb string = '2'

@secure()
@description('The task envelope (JSON or base64 JSON): what a queue message holds. A secure value: a plain one is returned by every read of the group.')
param taskData string

@description('WORKER_TASK_TIMEOUT in seconds: the only timeout on this path.')
param taskTimeoutSeconds int = 1800

@description('Log Analytics workspace receiving the container logs.')
param workspaceName string

@secure()
param webhookSecret string

@secure()
param supabaseKey string

@secure()
param openaiApiKey string

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
}

resource group 'Microsoft.ContainerInstance/containerGroups@2023-05-01' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    osType: 'Linux'
    sku: 'Standard'
    restartPolicy: 'Never'
    imageRegistryCredentials: [
      {
        server: registryLoginServer
        identity: identityId
      }
    ]
    containers: [
      {
        name: 'worker'
        properties: {
          image: image
          resources: {
            requests: {
              cpu: json(cpuCores)
              memoryInGB: json(memoryInGb)
            }
          }
          environmentVariables: [
            // Secure: the payload is the backend's data, and a plain value
            // is returned to anyone who can read the group (Reader).
            {
              name: 'TASK_DATA'
              secureValue: taskData
            }
            {
              name: 'WORKER_LOG_FORMAT'
              value: 'json'
            }
            {
              name: 'WORKER_TASK_TIMEOUT'
              value: string(taskTimeoutSeconds)
            }
            {
              name: 'WORKER_CLIENT'
              value: client
            }
            {
              name: 'AZURE_STORAGE_ACCOUNT'
              value: storageAccountName
            }
            {
              name: 'AZURE_CLIENT_ID'
              value: identityClientId
            }
            {
              name: 'WORKER_WEBHOOK_SECRET'
              secureValue: webhookSecret
            }
            {
              name: 'SUPABASE_KEY'
              secureValue: supabaseKey
            }
            {
              name: 'OPENAI_API_KEY'
              secureValue: openaiApiKey
            }
          ]
        }
      }
    ]
    // Which table this fills and why not diagnostic settings: see the
    // file's head (ContainerInstanceLog_CL).
    diagnostics: {
      logAnalytics: {
        workspaceId: workspace.properties.customerId
        workspaceKey: workspace.listKeys().primarySharedKey
        logType: 'ContainerInstanceLogs'
      }
    }
  }
}

output name string = group.name
output id string = group.id
